"""The OpenAI-compatible backend against a loopback chat-completions server, and the shared retry policy."""

from __future__ import annotations

import random
import socket
import threading
from contextlib import closing
from typing import Any

import pytest

from funnelqa.backends import BackendOptions, CachedBackend, ModelSpec, Request, load_backend
from funnelqa.backends.http_retry import backoff_delay, parse_retry_after
from funnelqa.backends.openai_compat import OpenAIBackend
from funnelqa.cache import LLMCache
from funnelqa.errors import BackendUnavailable, UsageError
from tests.gemini_server import LoopbackServer

MODEL = "qwen2.5-7b-instruct"


class FakeOpenAIServer(LoopbackServer):
    """``POST /v1/chat/completions`` as vLLM and llama.cpp serve it; ``"null"`` answers content null,
    ``"no-choices"`` answers ``choices: []`` and ``"length"`` a reply cut at max_tokens."""

    special_faults = frozenset({"null", "no-choices", "length"})

    @staticmethod
    def echo(body: dict[str, Any]) -> str:
        return f"echo: {last_user_text(body)}"

    def handles(self, path: str) -> bool:
        return path == "/v1/chat/completions"

    def answer_body(self, path: str, body: dict[str, Any], text: str | None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": 1700000000,
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error", "code": status}}

    def error_headers(self, status: int) -> dict[str, str]:
        return {"Retry-After": "0"} if status == 429 else {}

    def special_fault(self, fault: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if fault == "no-choices":
            return {**self.answer_body(path, body, None), "choices": []}
        if fault == "length":
            answer = self.answer_body(path, body, '{"tags": [{"tag": "Gen')
            answer["choices"][0]["finish_reason"] = "length"
            return answer
        return self.answer_body(path, body, None)


def last_user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(OpenAIBackend, "backoff_base", 0.001)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def connect(server):
    """Backends aimed at the fake server; their connections close after the test."""
    made: list[OpenAIBackend] = []

    def connect(**options) -> OpenAIBackend:
        settings = {"timeout": 0.5, "concurrency": 4, "max_retries": 3} | options
        made.append(OpenAIBackend(MODEL, f"{server.url}/v1", **settings))
        return made[-1]

    yield connect
    for backend in made:
        backend.close()


def questions(count: int, **options) -> list[Request]:
    return [Request.chat("You are terse.", f"question {i}", **options) for i in range(count)]


@pytest.mark.parametrize("arg", [MODEL, f"{MODEL}@", "@http://localhost:8000/v1"])
def test_a_spec_without_model_or_url_says_the_form(arg):
    with pytest.raises(UsageError, match="openai:MODEL@BASE_URL"):
        load_backend(ModelSpec.parse(f"openai:{arg}"))


def test_a_base_url_without_scheme_is_refused():
    with pytest.raises(UsageError, match="http://"):
        load_backend(ModelSpec.parse(f"openai:{MODEL}@localhost:8000/v1"))


def test_answers_come_back_in_order_from_concurrent_workers():
    concurrency = 3
    # Every worker must be inside the server at once to pass the barrier.
    barrier = threading.Barrier(concurrency, timeout=5)

    def respond(body):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return "not concurrent"
        return f"answer to {last_user_text(body)}"

    with FakeOpenAIServer(respond) as server:
        with closing(OpenAIBackend(MODEL, f"{server.url}/v1", concurrency=concurrency, timeout=30)) as backend:
            answers = backend.generate(questions(6))
    assert answers == [f"answer to question {i}" for i in range(6)]
    assert len(server.requests) == 6


def test_the_request_carries_messages_options_schema_and_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backend = load_backend(ModelSpec.parse(f"openai:{MODEL}@{server.url}/v1/"), BackendOptions(timeout=1.0))
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    request = Request.chat("Be brief.", "Favourite genre?", max_tokens=64, temperature=0.2, seed=5, json_schema=schema)
    assert backend.generate([request]) == ["echo: Favourite genre?"]
    backend.close()

    body = server.requests[0]
    assert server.paths == ["/v1/chat/completions"]
    assert server.headers[0]["authorization"] == "Bearer sk-test"
    assert body["model"] == MODEL
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Favourite genre?"}]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (64, 0.2, 5)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_without_key_or_schema_nothing_extra_is_sent(server, connect):
    connect().generate(questions(1))
    assert "authorization" not in server.headers[0]
    assert "response_format" not in server.requests[0]


def test_rate_limits_server_errors_timeouts_and_garbled_bodies_are_retried(server, connect):
    server.inject("429", "500", "slow", "malformed", "502")
    answers = connect().generate(questions(5))
    assert answers == [f"echo: question {i}" for i in range(5)]
    assert len(server.requests) == 5 + 5


def test_a_persistent_server_error_fails_that_request_after_the_last_retry(server, connect):
    server.inject(*["503"] * 3)
    [answer] = connect(max_retries=2).generate_each(questions(1))
    assert answer.finish == "failed"
    assert "503" in answer.detail and MODEL in answer.detail and "3 attempts" in answer.detail
    assert len(server.requests) == 3


def test_one_request_failing_for_good_leaves_its_batch_mates_answered(server, connect):
    from tests.gemini_server import Fault

    server.responder = lambda body: Fault("500") if last_user_text(body) == "question 1" else server.echo(body)
    answers = connect(max_retries=1).generate_each(questions(4))
    assert answers == ["echo: question 0", "", "echo: question 2", "echo: question 3"]
    assert answers[1].finish == "failed" and "HTTP 500" in answers[1].detail
    assert len(server.requests) == 3 + 2


def test_each_backoff_is_one_stderr_line_with_its_reason_wait_and_retry_and_no_secret(server, capsys):
    # A key in the base URL and one the server echoes in its message: neither may reach the log.
    server.error_body = lambda status, message: {"error": {"message": f"{message} See {server.url}/quota?api_key=sk-LEAKED"}}
    secret_url = server.url.replace("http://", "http://user:sk-SECRET@") + "/v1"
    server.inject("429", "503")
    with closing(OpenAIBackend(MODEL, secret_url, timeout=5, concurrency=1, max_retries=3)) as backend:
        assert backend.generate(questions(1)) == ["echo: question 0"]
        assert backend.counters() == {"http_retries": 2}
    err = capsys.readouterr().err
    assert "SECRET" not in err and "LEAKED" not in err
    label = f"openai:{MODEL}@http://***@127.0.0.1:{server.url.rsplit(':', 1)[1]}/v1"
    first, second = [line for line in err.splitlines() if "; retry " in line]
    assert first.startswith(f"{label}: HTTP 429: Injected fault")
    assert first.endswith("?api_key=***; retry 1 of 3 in 0.0 s, the server asked for 0 s")
    assert second.startswith(f"{label}: HTTP 503: Injected fault") and second.endswith("; retry 2 of 3 in 0.0 s")


def test_client_errors_are_not_retried_and_keep_the_server_message(server, connect):
    server.inject("400", "401")
    [answer] = connect().generate_each(questions(1))
    assert answer.finish == "failed" and "Injected fault" in answer.detail
    with pytest.raises(BackendUnavailable, match="Injected fault") as failure:
        connect().generate(questions(1))
    assert len(server.requests) == 2
    assert "OPENAI_API_KEY" in str(failure.value)


def test_no_choices_and_cut_replies_are_named_like_geminis(server, connect):
    server.inject("no-choices", "length")
    empty, cut = connect(concurrency=1).generate(questions(2, max_tokens=16))
    assert empty.finish == "empty" and "no choices" in empty.detail
    assert cut.finish == "length" and cut.detail == "finish_reason length at max_tokens=16"


def test_null_content_answers_empty_text(server, connect):
    server.inject("null")
    assert connect(concurrency=1).generate(questions(2)) == ["", "echo: question 1"]


def test_nothing_listening_is_retried_then_reported_as_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with closing(OpenAIBackend(MODEL, f"http://127.0.0.1:{port}/v1", timeout=0.5, max_retries=2)) as backend:
        with pytest.raises(BackendUnavailable, match=f"no server answers at http://127.0.0.1:{port}/v1 .*3 attempts"):
            backend.generate(questions(1))


def test_cache_serves_a_rerun_without_calls(server, tmp_path, connect):
    cached = CachedBackend(connect(), LLMCache(tmp_path / "llm-cache.sqlite"))
    first = cached.generate(questions(4))
    again = cached.generate(questions(4))
    cached.close()
    assert first == again == [f"echo: question {i}" for i in range(4)]
    assert len(server.requests) == 4
    assert cached.hits == 4


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    rng = random.Random(0)
    for attempt in range(8):
        ceiling = min(10.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 10.0, None, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


def test_backoff_waits_at_least_the_servers_hint_within_the_cap():
    rng = random.Random(0)
    assert backoff_delay(0, 0.01, 60.0, 7.0, rng) == 7.0
    assert backoff_delay(0, 0.01, 60.0, 600.0, rng) == 60.0


@pytest.mark.parametrize(("header", "seconds"), [("3", 3.0), ("0.5", 0.5), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None)])
def test_retry_after_header(header, seconds):
    assert parse_retry_after(header) == seconds
