"""The Gemini backend, driven through the real google-genai client against a loopback fake of the API."""

from __future__ import annotations

import socket
import threading
from contextlib import closing

import pytest

from funnelqa.backends import BackendOptions, CachedBackend, ModelSpec, Request, load_backend
from funnelqa.backends.gemini import GeminiBackend, retry_delay_hint
from funnelqa.cache import LLMCache
from funnelqa.errors import BackendError, BackendUnavailable, UsageError
from tests.gemini_server import FakeGeminiServer, Fault, gemini_prompt_text

MODEL = "gemini-2.0-flash"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(GeminiBackend, "backoff_base", 0.001)


@pytest.fixture
def server():
    with FakeGeminiServer() as fake:
        yield fake


@pytest.fixture
def connect(server):
    """Backends aimed at the fake server; their connections close after the test."""
    made: list[GeminiBackend] = []

    def connect(**options) -> GeminiBackend:
        settings = {"timeout": 0.5, "concurrency": 4, "max_retries": 3} | options
        made.append(GeminiBackend(MODEL, "test-key", base_url=server.url, **settings))
        return made[-1]

    yield connect
    for backend in made:
        backend.close()


def questions(count: int, **options) -> list[Request]:
    return [Request.chat("You are terse.", f"question {i}", **options) for i in range(count)]


def test_answers_come_back_in_order_from_concurrent_workers():
    concurrency = 4
    # Every worker must be inside the server at once to pass the barrier; one at a time would
    # break it and turn the answers into "not concurrent". The client timeout outlasts the
    # barrier so that retries of a sequential client cannot fill it.
    barrier = threading.Barrier(concurrency, timeout=5)

    def respond(body):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return "not concurrent"
        return f"answer to {gemini_prompt_text(body)}"

    with FakeGeminiServer(respond) as server:
        with closing(GeminiBackend(MODEL, "test-key", base_url=server.url, concurrency=concurrency, timeout=30)) as backend:
            answers = backend.generate(questions(8))

    assert answers == [f"answer to question {i}" for i in range(8)]
    assert len(server.requests) == 8
    assert all(path == f"/v1/models/{MODEL}:generateContent" for path in server.paths)
    assert {headers["x-goog-api-key"] for headers in server.headers} == {"test-key"}


def test_messages_and_options_map_onto_the_generate_content_body(server, connect):
    backend = connect()
    request = Request(
        messages=(
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Favourite genre?"},
        ),
        max_tokens=77,
        temperature=0.3,
        seed=11,
    )
    assert backend.generate([request]) == ["echo: Favourite genre?"]
    body = server.requests[0]
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert [(c["role"], c["parts"][0]["text"]) for c in body["contents"]] == [
        ("user", "Hi"),
        ("model", "Hello."),
        ("user", "Favourite genre?"),
    ]
    config = body["generationConfig"]
    assert (config["temperature"], config["maxOutputTokens"], config["seed"]) == (0.3, 77, 11)
    assert "responseMimeType" not in config


def test_json_schema_asks_for_structured_output(server, connect):
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["tags"],
        "additionalProperties": False,
    }
    connect().generate(questions(1, json_schema=schema))
    config = server.requests[0]["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == schema


def test_rate_limits_server_errors_timeouts_and_garbled_bodies_are_retried(server, connect):
    server.inject("429", "500", "slow", "malformed", "503")
    answers = connect(timeout=0.5, max_retries=3).generate(questions(6))
    assert answers == [f"echo: question {i}" for i in range(6)]
    # Each fault cost exactly one extra request.
    assert len(server.requests) == 6 + 5


def test_a_json_body_without_candidates_or_prompt_feedback_is_retried(server, connect):
    server.inject("hollow", "hollow")
    assert connect(concurrency=1).generate(questions(1)) == ["echo: question 0"]
    assert len(server.requests) == 3


def test_a_persistent_server_error_fails_that_request_after_the_last_retry(server, connect):
    server.inject(*["500"] * 3)
    [answer] = connect(max_retries=2).generate_each(questions(1))
    assert answer == "" and answer.finish == "failed"
    assert "500" in answer.detail and MODEL in answer.detail and "3 attempts" in answer.detail
    assert "\n" not in answer.detail
    assert len(server.requests) == 3
    server.inject(*["500"] * 3)
    with pytest.raises(BackendError, match="gave up after 3 attempts: HTTP 500"):
        connect(max_retries=2).generate(questions(1))  # generate keeps its contract: a failure raises


def test_a_bad_request_fails_that_request_alone_without_retries(server, connect):
    server.inject("400")
    [answer] = connect().generate_each(questions(1))
    assert answer.finish == "failed" and "HTTP 400" in answer.detail and "Injected fault" in answer.detail
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", ["404", "401", "403"])
def test_faults_no_request_can_pass_stop_the_batch_without_retries(server, status, connect):
    server.inject(status)
    with pytest.raises(BackendUnavailable) as failure:
        connect().generate(questions(1))
    assert f"HTTP {status}" in str(failure.value) and "Injected fault" in str(failure.value)
    assert len(server.requests) == 1


def test_one_request_failing_for_good_leaves_its_batch_mates_answered(connect, server, capsys):
    def respond(body):
        return Fault("500") if gemini_prompt_text(body) == "question 2" else server.echo(body)

    server.responder = respond
    answers = connect(max_retries=2).generate_each(questions(5))
    assert [str(a) for a in answers] == [f"echo: question {i}" if i != 2 else "" for i in range(5)]
    assert answers[2].finish == "failed" and "gave up after 3 attempts: HTTP 500" in answers[2].detail
    assert len(server.requests) == 4 + 3
    waits = [line for line in capsys.readouterr().err.splitlines() if "retry" in line]
    assert len(waits) == 2 and all("HTTP 500" in line for line in waits)


def test_a_blocked_prompt_answers_empty_text_naming_the_block(server, connect):
    server.inject("blocked")
    # One worker, so the fault meets the first question.
    answers = connect(concurrency=1).generate(questions(2))
    assert answers == ["", "echo: question 1"]
    assert answers[0].finish == "blocked" and "promptFeedback.blockReason SAFETY" in answers[0].detail
    assert len(server.requests) == 2


def test_safety_stops_max_tokens_cuts_and_empty_candidates_are_named(server, connect):
    server.inject("safety", "no-candidates")
    backend = connect(concurrency=1)
    safety, empty = backend.generate(questions(2))
    assert safety.finish == "blocked" and "finishReason SAFETY" in safety.detail and "DANGEROUS" in safety.detail
    assert empty.finish == "empty" and "no candidates" in empty.detail
    [cut] = backend.generate([Request.chat(None, "x" * 100, max_tokens=8)])
    assert cut.finish == "length" and cut.detail == "finishReason MAX_TOKENS at maxOutputTokens=8"
    assert cut == ("echo: " + "x" * 100)[:32]


def test_the_server_rejects_empty_parts_and_the_backend_never_sends_them(server, connect):
    import httpx

    reply = httpx.post(f"{server.url}/v1beta/models/{MODEL}:generateContent",
                       json={"contents": [{"role": "user", "parts": [{"text": ""}]}]})
    assert reply.status_code == 400 and reply.json()["error"]["status"] == "INVALID_ARGUMENT"
    empty_turn = Request(messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
                                   {"role": "user", "content": "again"}))
    [answer] = connect().generate_each([empty_turn])
    assert answer.finish == "failed" and "empty" in answer.detail
    assert len(server.requests) == 1  # only the probe above reached the server


def test_retry_after_header_is_honoured_and_logged(capsys, monkeypatch):
    from funnelqa.backends import http_retry

    hints = []

    def no_wait(attempt, base, cap, retry_after, rng):
        hints.append(retry_after)
        return 0.0

    monkeypatch.setattr(http_retry, "backoff_delay", no_wait)
    with FakeGeminiServer(retry_after="7") as fake:
        fake.inject("429")
        # The RetryInfo of this fake says 0 s; without it the header's 7 s count.
        fake.error_body = lambda status, message: {"error": {"code": status, "message": message, "status": "RESOURCE_EXHAUSTED"}}
        with closing(GeminiBackend(MODEL, "test-key", base_url=fake.url, timeout=5, max_retries=1, concurrency=1)) as backend:
            assert backend.generate(questions(1)) == ["echo: question 0"]
            assert backend.counters() == {"http_retries": 1}
    assert hints == [7.0]
    assert "the server asked for 7 s" in capsys.readouterr().err


def test_nothing_listening_is_reported_as_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with closing(GeminiBackend(MODEL, "test-key", base_url=f"http://127.0.0.1:{port}", timeout=0.5, max_retries=1)) as backend:
        with pytest.raises(BackendUnavailable, match="no server answers at http://127.0.0.1"):
            backend.generate(questions(1))


def test_missing_key_says_how_to_fix_it(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(BackendUnavailable, match="GEMINI_API_KEY"):
        load_backend(ModelSpec.parse(f"gemini:{MODEL}"))


def test_a_spec_without_model_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    with pytest.raises(UsageError, match="gemini:gemini-2.0-flash"):
        load_backend(ModelSpec.parse("gemini:"))


def test_the_retry_info_of_a_429_is_read():
    details = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17.5s"},
            ],
        }
    }
    assert retry_delay_hint(details) == 17.5
    assert retry_delay_hint({"error": {"code": 500}}) is None


def test_registry_backend_with_cache_serves_a_rerun_without_calls(server, monkeypatch, tmp_path):
    monkeypatch.setenv("FUNNELQA_GEMINI_BASE_URL", server.url)
    monkeypatch.setenv("GEMINI_API_KEY", "test-key")
    backend = load_backend(ModelSpec.parse(f"gemini:{MODEL}"), BackendOptions(concurrency=3, timeout=1.0, max_retries=2))
    assert isinstance(backend, GeminiBackend) and backend.cache_id == f"gemini:{MODEL}"
    cached = CachedBackend(backend, LLMCache(tmp_path / "llm-cache.sqlite"))
    server.inject("429")

    first = cached.generate(questions(5))
    asked = len(server.requests)
    again = cached.generate(questions(5))
    cached.close()

    assert first == again == [f"echo: question {i}" for i in range(5)]
    assert asked == 6
    assert len(server.requests) == asked
    assert cached.hits == 5


def test_the_fake_server_stops_by_itself_at_its_deadline():
    server = FakeGeminiServer(deadline_seconds=0.1).start()
    assert server.stopped.wait(timeout=30)
    with closing(GeminiBackend(MODEL, "test-key", base_url=server.url, timeout=0.5, max_retries=0)) as backend:
        with pytest.raises(BackendUnavailable, match="no server answers"):
            backend.generate(questions(1))
